"""The notebooks: one ``parameters`` cell, fail fast on a bad parameter, committed with real outputs,
run on the project's kernel; ``make reproduce`` writes beside the committed study, never over it.

``make test`` also executes every notebook under the ci profile with ``pytest --nbval-lax`` (see the
Makefile) and then runs :func:`test_ci_run_wrote_figures` against what that run wrote
(``M3BSR_CI_BUILD`` names the build folder; without it that test is skipped).
"""
import json
import os
import shutil
import subprocess
from pathlib import Path

import nbformat
import pytest

from m3bsr import viz
from m3bsr.data.sources import dataset_missing

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
COMMON_PARAMETERS = {"profile", "plan", "datasets", "seeds", "device", "data_root", "figures_dir", "results_dir", "runs_dir"}
# figures each notebook must write under the ci profile (name stems; PNG and PDF each)
CI_FIGURES = {
    "01_data_preparation": ["01_sequence_lengths", "01_timeline_synthetic", "01_alignment", "01_poster_neighbours",
                            "01_timeline_ml-100k-mm"],
    "02_diffusion_internals": ["02_schedules", "02_forward_noising", "02_cdmd_chain", "02_attention", "02_cdbd_clicks"],
    "03_training": ["03_live_training", "03_curves_synthetic", "03_ndcg10"],
    "04_main_results": ["04_ndcg10"],
    "05_ablations": ["05_ablations", "05_contrastive", "05_steps"],
    "06_denoising_figures": ["06_tsne", "06_umap", "06_tsne_ml-100k-mm", "06_umap_ml-100k-mm"],
    "07_where_denoising_matters": ["07_regimes"],
}
# figures drawn from a real dataset: expected only where it is under the data root (always under M3BSR_REQUIRE_DATA=1)
FIGURE_DATASET = {"01_poster_neighbours": "ml-100k-mm", "01_timeline_ml-100k-mm": "ml-100k-mm", "06_tsne_ml-100k-mm": "ml-100k-mm",
                  "06_umap_ml-100k-mm": "ml-100k-mm"}
ids = [p.stem for p in NOTEBOOKS]
KERNEL = "m3bsr"  # the notebooks' Jupyter kernel, installed into .venv by `make install`


@pytest.fixture
def project_kernel():
    """papermill starts the kernel a notebook names: fail with the fix when it is not installed."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    try:
        KernelSpecManager().get_kernel_spec(KERNEL)
    except NoSuchKernel:
        pytest.fail(f"no Jupyter kernel named {KERNEL!r}: `make install` installs it "
                    f"(python -m ipykernel install --sys-prefix --name {KERNEL})")


def tags(cell) -> list[str]:
    return list(cell.metadata.get("tags", []))


def code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def test_there_are_notebooks():
    assert {"01_data_preparation", "03_training"} <= set(ids)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_one_parameters_cell_first_with_the_common_parameters(path):
    nb = nbformat.read(path, as_version=4)
    cells = code_cells(nb)
    assert [tags(c) for c in cells].count(["parameters"]) == 1
    assert sum("parameters" in tags(c) for c in nb.cells) == 1, "exactly one cell tagged 'parameters'"
    assert "parameters" in tags(cells[0]), "the parameters cell is the first code cell"
    import papermill
    assert COMMON_PARAMETERS <= set(papermill.inspect_notebook(str(path)))
    after = [c for c in cells[1:] if "injected-parameters" not in tags(c)][0]
    assert "viz.check_" in after.source, "the cell after the parameters validates them"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_committed_notebook_carries_default_profile_outputs(path):
    nb = nbformat.read(path, as_version=4)
    cells = code_cells(nb)
    assert all(c.execution_count is not None for c in cells), "executed top to bottom (make publish)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_committed_notebook_outputs_are_from_the_default_profile_without_errors(path):
    nb = nbformat.read(path, as_version=4)
    cells = code_cells(nb)
    assert not any(o.output_type == "error" for c in cells for o in c.outputs)
    injected = [c for c in cells if "injected-parameters" in tags(c)]
    profile = nb.metadata.get("papermill", {}).get("parameters", {}).get("profile", "default")
    assert profile == "default", f"outputs come from profile {profile!r}, not default"
    assert all("profile = \"ci\"" not in c.source for c in injected)


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.stem[:2] in ("04", "05", "06", "07")], ids=lambda p: p.stem)
def test_committed_studies_are_the_full_plan(path):
    """docs/results.md's tables and the notebooks' summaries describe the full plan (`make publish`), whose
    runs are committed in results/runs."""
    parameters = nbformat.read(path, as_version=4).metadata.get("papermill", {}).get("parameters", {})
    assert parameters.get("plan") == "full" and parameters.get("runs_dir") == "results/runs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_notebook_runs_on_the_project_kernel_and_prints_its_environment(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata.kernelspec["name"] == KERNEL and nb.metadata.kernelspec["language"] == "python"
    cells = [c for c in code_cells(nb) if "injected-parameters" not in tags(c)]
    assert cells[2].source.startswith("# NBVAL_IGNORE_OUTPUT\nprint(viz.environment(device))"), \
        "the cell after the validation cell prints the versions and the device"
    assert f"--name {KERNEL} " in (REPO / "Makefile").read_text(), "make install installs the kernel the notebooks name"


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("target, out", [("reproduce", "reproduce"), ("reproduce OUT=/tmp/r1", "/tmp/r1"), ("publish", ".")])
def test_reproduce_writes_beside_the_committed_study_unless_publishing(target, out):
    """`make -n` prints the papermill commands: each notebook goes to OUT/notebooks with its figures,
    tables and runs under OUT; only OUT=. (make publish, the full plan) writes the committed folders,
    its runs in results/runs."""
    printed = subprocess.run(["make", "-n", *target.split()], cwd=REPO, capture_output=True, text=True, check=True).stdout
    commands = [line for line in printed.splitlines() if "-m papermill" in line]
    assert len(commands) == 1 and "--progress-bar" in commands[0], "one loop over the notebooks, showing progress"
    command = commands[0]
    assert f" $nb {out}/notebooks/$(basename $nb) " in command
    if out == ".":
        assert "-p plan full" in command and "figures_dir" not in command and "results_dir" not in command
        assert "-p runs_dir results/runs" in command, "the study's runs land beside its tables (results/runs)"
    else:
        assert all(f"-p {d}_dir {out}/{d}" in command for d in ("figures", "results", "runs"))
    assert f"{out}/results results" in subprocess.run(["make", "-n", "compare", f"OUT={out}"], cwd=REPO,
                                                       capture_output=True, text=True, check=True).stdout


def test_readme_shows_the_committed_main_table():
    """The README's result table is notebook 04's committed one (experiments.headline), not a copy gone stale."""
    from m3bsr.experiments import headline
    assert headline(REPO / "results") in (REPO / "README.md").read_text()


def test_readme_shows_the_committed_verdicts():
    """The README's verdict table is the one notebook 07 wrote from the committed study (results/07_verdicts.md)."""
    assert (REPO / "results" / "07_verdicts.md").read_text() in (REPO / "README.md").read_text()


def test_reproduction_folder_is_ignored_by_git():
    assert "reproduce/" in (REPO / ".gitignore").read_text().splitlines()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_no_machine_paths_in_committed_cells(path):
    text = json.dumps([{"source": c.source, "outputs": c.get("outputs", [])} for c in nbformat.read(path, 4).cells])
    assert str(REPO) not in text
    assert str(REPO.parent) + "/shared" not in text


def test_no_machine_paths_in_committed_runs():
    logs = [p.parent / "train.log" for p in sorted((REPO / "results" / "runs").glob("*/metrics.json"))]  # finished runs
    assert not [p.parent.name for p in logs if str(REPO) in p.read_text()]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_unknown_dataset_fails_in_the_validation_cell(path, tmp_path, project_kernel):
    import papermill
    from papermill.exceptions import PapermillExecutionError
    with pytest.raises(PapermillExecutionError) as err:
        papermill.execute_notebook(str(path), str(tmp_path / path.name), parameters={"datasets": ["nope"]},
                                   progress_bar=False, cwd=str(tmp_path))
    assert err.value.ename == "ValueError"
    assert "'nope'" in err.value.evalue and "allowed" in err.value.evalue
    assert "viz.check_" in err.value.source, "fails in the validation cell, before any work"


@pytest.mark.parametrize("kwargs, bad", [
    (dict(profile="huge"), "'huge'"),
    (dict(datasets=["ml-1m"]), "'ml-1m'"),
    (dict(datasets="synthetic"), "'synthetic'"),
    (dict(seeds=[0.5]), "[0.5]"),
    (dict(device="tpu"), "'tpu'"),
    (dict(models=["sasrec", "gru4rec"]), "'gru4rec'"),
    (dict(data_root="no/such/folder"), "'no/such/folder'"),
    (dict(jobs=0), "got 0"),
    (dict(jobs=1.5), "got 1.5"),
    (dict(plan="tiny"), "'tiny'"),
])
def test_check_parameters_names_the_bad_value(kwargs, bad):
    args = dict(profile="ci", datasets=["synthetic"], seeds=[0], device="cpu", data_root=None, models=None)
    with pytest.raises(ValueError) as err:
        viz.check_parameters(**{**args, **kwargs})
    assert bad in str(err.value)


def test_check_parameters_accepts_the_defaults():
    viz.check_parameters("ci", list(viz.DATASETS), [0, 1], "auto", None, ["pop", "sasrec"])


def test_plan_follows_the_profile_unless_given():
    assert [viz.resolve_plan(None, p) for p in ("ci", "default", "paper")] == ["full", "quick", "full"]
    assert [viz.resolve_plan(plan, "default") for plan in ("quick", "full")] == ["quick", "full"]
    with pytest.raises(ValueError, match="'Full'"):
        viz.resolve_plan("Full", "paper")


def test_quick_plan_runs_end_to_end_under_ci(tmp_path, project_kernel):
    """`make reproduce` runs notebooks 04-07's quick plan, `make test` their full plan (the ci default):
    this runs the quick one at ci scale and checks it kept what it says it keeps."""
    import pandas as pd
    import papermill
    out = {name: str(tmp_path / name.removesuffix("_dir")) for name in ("figures_dir", "results_dir", "runs_dir")}
    for path in [p for p in NOTEBOOKS if p.stem[:2] in ("04", "05", "06", "07")]:
        papermill.execute_notebook(str(path), str(tmp_path / path.name), progress_bar=False, cwd=str(tmp_path),
                                   parameters={"profile": "ci", "plan": "quick", **out})
    results = tmp_path / "results"
    assert set(pd.read_csv(results / "04_main_full.csv")["dataset"]) == {"synthetic"}
    assert list(pd.read_csv(results / "05_ablations.csv")["variant"])[:3] == ["full", "w/o CDMD", "w/o CDBD"]
    assert list(pd.read_csv(results / "05_steps.csv")["T"]) == [1, 15]
    regimes = pd.read_csv(results / "07_regimes.csv")
    assert regimes.groupby("field")["value"].apply(list).to_dict() == {
        "deep_noise": [0.0, 0.4], "syn_feature_noise": [1.0, 2.5], "syn_noise": [0.3, 0.5]}
    assert len(pd.read_csv(results / "06_genre_scores.csv")) == 0  # no MovieLens run in the quick plan


def test_figures_are_byte_identical_on_rerun(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def draw(folder):
        fig, ax = plt.subplots()
        ax.plot([0, 1, 4])
        out = viz.save_figure(fig, "x", folder)
        plt.close(fig)
        return [p.read_bytes() for p in out]

    assert draw(tmp_path / "a") == draw(tmp_path / "b")


def test_paths_resolve_against_the_repository_not_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert viz.resolve_path("build/figures") == REPO / "build" / "figures"
    assert viz.resolve_path(tmp_path) == tmp_path


@pytest.mark.skipif(not os.environ.get("M3BSR_CI_BUILD"), reason="runs after `make test` executed the notebooks")
def test_ci_run_wrote_figures():
    build = REPO / os.environ["M3BSR_CI_BUILD"]
    figures = build / "figures"
    required = os.environ.get("M3BSR_REQUIRE_DATA") == "1"
    for nb in sorted((build / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        expected = [stem for stem in CI_FIGURES.get(nb.stem, [])
                    if required or stem not in FIGURE_DATASET or not dataset_missing(FIGURE_DATASET[stem])]
        written = sorted(figures.glob(f"{nb.stem[:2]}_*.png"))
        assert written, f"{nb.name} wrote no figure"
        for stem in expected:
            for ext in ("png", "pdf"):
                f = figures / f"{stem}.{ext}"
                assert f.is_file() and f.stat().st_size > 0, f"{nb.name}: {f.name} missing or empty"
    for f in figures.iterdir():
        assert f.stat().st_size > 0, f"{f.name} is empty"


def test_one_event_per_item_keeps_each_item_once():
    import numpy as np
    items = np.array([3, 1, 3, 3, 2, 1])
    keep = viz.one_event_per_item(items, seed=1)
    assert sorted(items[keep]) == [1, 2, 3] and list(keep) == sorted(keep)


def test_interest_agreement_counts_neighbours_in_the_users_clusters():
    import numpy as np
    # two tight groups of points: items of cluster 0 near (1, 0), items of cluster 1 near (0, 1)
    x = np.array([[1, 0.01], [1, 0.02], [1, 0.03], [0.01, 1], [0.02, 1], [0.03, 1]])
    cluster = np.array([0, 0, 0, 1, 1, 1])
    users = np.array([[0, -1]] * 3 + [[0, -1], [1, -1], [0, 1]])  # the 4th event: a cluster-1 item of a cluster-0 user
    agree = viz.interest_agreement(x, cluster, users, k=2)
    assert agree.tolist() == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    assert viz.label_agreement(x, np.ones(6, bool), cluster, k=2) == 1.0


def test_markdown_tables_escape_pipes_in_headers_and_cells():
    import pandas as pd
    md = viz.to_markdown(pd.DataFrame({"P(a | b)": [0.5], "name": ["x|y"]}))
    header, rule, row = md.splitlines()
    assert header == "| P(a \\| b) | name |" and rule == "|---|---|" and row == "| 0.5 | x\\|y |"


def test_nearest_neighbours_refuses_fewer_candidates_than_k():
    import numpy as np
    x, mask = np.random.default_rng(0).normal(size=(8, 4)), np.zeros(8, bool)
    mask[1:4] = True
    with pytest.raises(ValueError, match="only 3 candidate rows"):
        viz.nearest_neighbours(x, mask, [0], k=5)
    assert sorted(viz.nearest_neighbours(x, mask, [0], k=3)[0]) == [1, 2, 3]


def test_denoising_embeddings_are_computed_again_when_the_saved_file_does_not_serve(tmp_path, monkeypatch):
    """Saved once (``.npz`` appended, atomically); a file lacking a requested method, or truncated, is
    computed again instead of failing."""
    from m3bsr.config import make_config
    from m3bsr.train import Trainer
    tr = Trainer(make_config("ci", {"dataset": "synthetic", "model": "m3bsr", "cache_dir": str(tmp_path / "c")}))
    split = {k: v[:8] for k, v in tr.seq.test.items()}
    calls = []
    monkeypatch.setattr(viz, "project_2d", lambda x, method, seed=0: calls.append(method) or x[:, :2])
    path = tmp_path / "emb"
    first = viz.denoising_embeddings(tr.model, split, path, methods=("A",))
    n = len(calls)
    assert n and (tmp_path / "emb.npz").is_file() and "A:input/id" in first
    assert viz.denoising_embeddings(tr.model, split, path, methods=("A",)).keys() == first.keys()
    assert len(calls) == n  # read back
    assert "B:cdbd/id" in viz.denoising_embeddings(tr.model, split, path, methods=("A", "B")) and len(calls) > n
    data = (tmp_path / "emb.npz").read_bytes()
    (tmp_path / "emb.npz").write_bytes(data[:len(data) // 2])  # killed mid-write by an older version
    assert "B:cdbd/id" in viz.denoising_embeddings(tr.model, split, path, methods=("A", "B"))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("x", ["epoch", "step"])
def test_training_log_plots_every_term_against_the_logged_axis_on_a_log_scale_where_terms_span_decades(x):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    log = pd.DataFrame({x: [4, 8], "loss": [5.5, 5.3], "ce": [5.3, 5.2], "contrast": [130.0, 110.0],
                        "modality": [0.1, 0.09], "valid_NDCG@10": [0.1, 0.2], "seconds": [1.0, 1.0]})
    fig = viz.plot_training_log(log, {"contrast": 0.001, "modality": 0.1})
    raw, weighted, ndcg = fig.axes
    assert [ln.get_label() for ln in raw.lines] == ["ce", "contrast", "modality"]
    assert [ln.get_label() for ln in weighted.lines] == ["ce", "0.001 × contrast", "0.1 × modality", "total"]
    assert list(weighted.lines[1].get_ydata()) == pytest.approx([0.13, 0.11])
    assert raw.get_yscale() == weighted.get_yscale() == "log" and raw.get_xlabel() == x
    assert list(ndcg.lines[0].get_xdata()) == [4, 8]
    plt.close(fig)
    flat = viz.plot_training_log(log.assign(contrast=[5.0, 5.1], modality=[1.0, 0.9]), {})
    assert flat.axes[0].get_yscale() == "linear"
    plt.close(flat)


def test_user_timeline_shows_the_last_max_len_events_before_each_target():
    """The histories notebook 01 draws are the last L events of each level strictly before the target,
    read from the evaluation and training rows; the validation and test targets are the last two favors."""
    import numpy as np
    from m3bsr.config import make_config
    from m3bsr.data.sequences import SequenceData
    from m3bsr.data.sources import load_dataset
    cfg = make_config("ci", {"dataset": "synthetic"})
    ds = load_dataset(cfg.data, features=False)
    L = 8
    seq = SequenceData(ds, L, cfg.data.min_deep)
    users = ds.interactions.groupby("user").size()
    user = int(users.loc[seq.test["users"].numpy()].idxmax())  # the longest: its oldest events fall outside L
    tl = viz.user_timeline(ds, seq, user)
    ev = ds.interactions[ds.interactions["user"] == user]
    favors = np.sort(ev.loc[ev["level"] == 1, "timestamp"].to_numpy())
    assert (tl["valid_time"], tl["test_time"]) == (favors[-2], favors[-1])
    for key, time in (("eval", tl["test_time"]), ("train", tl["train_time"])):
        for s in (0, 1):
            t = np.sort(ev.loc[ev["level"] == s, "timestamp"].to_numpy())
            assert list(tl[key][s]) == list(t[t < time][-L:]), (key, s)
    assert tl["train_time"] in tl["row_targets"] and tl["train_time"] < tl["valid_time"]
    assert len(tl["eval"][0]) == L  # the window cut something off
