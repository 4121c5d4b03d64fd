"""The command line's own checks: model names, the config table, check-data's checksums and exit codes."""
import dataclasses
import hashlib
import re

import pytest

from m3bsr.cli import main
from m3bsr.config import Config
from m3bsr.data import checks
from m3bsr.data.sources import LAYOUT
from m3bsr.models.registry import MODELS


def test_train_help_lists_the_models_and_an_unknown_one_fails_before_any_data_loads(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "{" + ",".join(sorted(MODELS)) + "}" in capsys.readouterr().out
    monkeypatch.setattr("m3bsr.data.sources.load_dataset", lambda *a, **k: pytest.fail("data loaded"))
    with pytest.raises(SystemExit) as err:
        main(["train", "--dataset", "synthetic", "--model", "sasrek", "--out", str(tmp_path / "run")])
    assert err.value.code == 2
    assert "invalid choice: 'sasrek'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_config_prints_every_field_with_its_value_type_and_allowed_values(capsys):
    assert main(["config", "--profile", "ci", "--set", "T=7"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "profile: ci"
    rows = {cells[0]: cells[1:] for cells in (re.split(r"\s{2,}", line) for line in lines[2:])}
    fields = [f"{s}.{f.name}" for s in ("data", "model", "train") for f in dataclasses.fields(getattr(Config(), s))]
    assert list(rows) == fields
    assert rows["model.T"][:3] == ["7", "int", ">= 1"] and rows["model.d"][0] == "32"  # the override, the ci value
    assert rows["model.T"][3] == "training diffusion steps (paper: 15)"  # the comment beside the field in config.py
    assert rows["model.tau"][1:3] == ["float", "> 0.0"]
    assert rows["model.router"][2] == "one of gate, softmax, mean"
    assert rows["model.model"][2] == "one of " + ", ".join(sorted(MODELS))
    assert rows["model.inference_steps"] == ["none", "int | None", ">= 1 | none",
                                             "<= T, strided; None: as trained (T, train_steps; random_t: 1 DDIM step)"]
    assert rows["data.syn_noise"][2] == "0.0..1.0" and rows["train.mask_seen"][:3] == ["false", "bool", "true | false"]


def test_config_rejects_a_bad_override(capsys):
    assert main(["config", "--profile", "ci", "--set", "heads=0"]) == 2
    assert "'heads' must be >= 1" in capsys.readouterr().err


def fake_root(tmp_path, monkeypatch):
    """A data root holding ml-100k-mm (two posters) and taobao-ub, with CHECKSUMS computed here by hand."""
    ml = tmp_path / "root" / "ml-100k-mm"
    (ml / "posters").mkdir(parents=True)
    (ml / "u.data").write_text("1\t10\t4\t100\n")
    (ml / "items.csv").write_text("movie_id,title\n10,A\n")
    (ml / "posters" / "10.jpg").write_bytes(b"poster ten")
    (ml / "posters" / "9.jpg").write_bytes(b"poster nine")
    (ml / "posters" / "notes.txt").write_text("not a poster: not part of the checksum")
    tb = tmp_path / "root" / "taobao-userbehavior-sample"
    tb.mkdir()
    (tb / "UserBehavior_sample.csv").write_text("1,10,5,pv,100\n")

    def sha(b: bytes) -> str:
        return hashlib.sha256(b).hexdigest()
    posters = f"10.jpg\0{sha(b'poster ten')}\n9.jpg\0{sha(b'poster nine')}\n".encode()  # name order: "10" < "9"
    monkeypatch.setattr(checks, "CHECKSUMS", {
        "ml-100k-mm": {"u.data": sha(b"1\t10\t4\t100\n"), "items.csv": sha(b"movie_id,title\n10,A\n"),
                       "posters/": sha(posters)},
        "taobao-ub": {"UserBehavior_sample.csv": sha(b"1,10,5,pv,100\n")},
    })
    return tmp_path / "root"


def status(out: str) -> dict[str, str]:
    return {line.split()[1]: line.split()[0] for line in out.splitlines()[1:-1]}


def test_check_data_passes_matching_files_and_reports_absent_datasets(tmp_path, monkeypatch, capsys):
    root = fake_root(tmp_path, monkeypatch)
    assert main(["check-data", "--data-root", str(root)]) == 0
    out = capsys.readouterr().out
    assert status(out) == {"ml-100k-mm/u.data": "ok", "ml-100k-mm/items.csv": "ok", "ml-100k-mm/posters/": "ok",
                           "ml-latest-small-mm/": "absent", "rec-tmall-sample/": "absent",
                           "taobao-userbehavior-sample/UserBehavior_sample.csv": "ok"}
    assert "(2 posters)" in out and "2 of 4 datasets present and matching" in out and "2 not present" in out
    assert main(["check-data", "--data-root", str(root), "--all"]) == 1, "--all: an absent dataset fails"


@pytest.mark.parametrize("damage, dataset, file", [
    (lambda root: (root / "taobao-userbehavior-sample" / "UserBehavior_sample.csv").write_text("1,10,5,pv,101\n"),
     "taobao-ub", "UserBehavior_sample.csv"),
    (lambda root: (root / "ml-100k-mm" / "posters" / "9.jpg").write_bytes(b"poster nine!"), "ml-100k-mm", "posters/"),
    (lambda root: (root / "ml-100k-mm" / "posters" / "9.jpg").rename(root / "ml-100k-mm" / "posters" / "8.jpg"),
     "ml-100k-mm", "posters/"),
], ids=["changed byte", "changed poster", "renamed poster"])
def test_check_data_fails_on_a_corrupted_file_or_poster(tmp_path, monkeypatch, capsys, damage, dataset, file):
    root = fake_root(tmp_path, monkeypatch)
    damage(root)
    assert main(["check-data", "--data-root", str(root)]) == 1
    out = capsys.readouterr().out
    assert [k for k, v in status(out).items() if v == "mismatch"] == [f"{LAYOUT[dataset][0]}/{file}"], "only that one"
    assert "expected " + checks.CHECKSUMS[dataset][file] in out


def test_check_data_fails_on_a_file_missing_from_a_present_dataset(tmp_path, monkeypatch, capsys):
    root = fake_root(tmp_path, monkeypatch)
    (root / "ml-100k-mm" / "items.csv").unlink()
    assert main(["check-data", "--data-root", str(root)]) == 1
    out = capsys.readouterr().out
    assert status(out)["ml-100k-mm/items.csv"] == "missing" and "data/README.md" in out


def test_check_data_without_a_data_root_is_an_error(tmp_path, capsys):
    assert main(["check-data", "--data-root", str(tmp_path / "nope")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_every_dataset_file_has_a_reference_checksum():
    assert {name: set(files) for name, (_, files) in LAYOUT.items()} == {k: set(v) for k, v in checks.CHECKSUMS.items()}


@pytest.mark.dataset("ml-100k-mm", "ml-latest-small-mm", "rec-tmall", "taobao-ub")
def test_the_data_root_holds_the_reference_copies():
    found, code = checks.check_data()
    assert code == 0 and {c.status for c in found} == {"ok"}, [c for c in found if c.status != "ok"]
