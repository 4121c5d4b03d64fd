"""``python -m m3bsr check-data``: every dataset's layout and SHA-256 checksums against the reference copies.

The reference copies are the files the committed results were computed from (data/README.md,
"Checksums"). A file's checksum is the SHA-256 of its bytes. A poster folder's is the SHA-256 of
``name NUL sha256(bytes) LF`` over its ``*.jpg`` files in name order (the files the loaders can read),
so renaming, adding, removing or changing one poster changes it.

A dataset whose folder is absent is *not present*: reported, and an error only when every dataset is
required (``--all``). A present dataset with a file missing, or a file whose checksum differs, fails.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from .sources import GET_DATA, LAYOUT, resolve_data_root

# dataset -> file (as in sources.LAYOUT) -> SHA-256 of the reference copy
CHECKSUMS: dict[str, dict[str, str]] = {
    "ml-100k-mm": {
        "u.data": "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
        "items.csv": "8e6f40029c1beebe19bf64b6e58f65c3fcb7bb31dbfc08e4d9681445dc74dc27",
        "posters/": "d09c050b8248f1289504f01de3888b76b1566b69ea1aea7684c34a968357e674",  # 1,663 posters
    },
    "ml-latest-small-mm": {
        "ratings.csv": "80da8b3393dae325bbba5a31f291a6ba55d8d4f4396de3c456f2c1635b1b70e8",
        "movies.csv": "c47b783f23eb304413307e1bb05335e427737da20ec8d3c0e96335567dd5f3dc",
        "tags.csv": "68eec00a0820c2faa8863a6df7032f13d5899a4462bce9a97213905297ff3d34",
        "posters/": "8de0bc139152052d69d1c66613d7646863ca5566e6844e112d75e5ec2953c896",  # 9,517 posters
    },
    "rec-tmall": {
        "sam_tianchi_2014002_rec_tmall_log.csv": "d37e8ef66620b72e9b3af10906efa8c654b8e41e0ada69eca41bf3ae38445a3c",
        "sam_tianchi_2014001_rec_tmall_product.csv": "bd7a940db8552491fcef0450d164ce516dca2c05c25767addbb0c206b3972771",
    },
    "taobao-ub": {
        "UserBehavior_sample.csv": "e6f47712a2ae149885993ac7b520cf5ba3b099b2e52f90cfddd912455c710e6d",
    },
}


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def folder_sha256(path: Path) -> tuple[str, int]:
    """(SHA-256 over ``name NUL sha256(bytes) LF`` of the folder's ``*.jpg`` files in name order, their count)."""
    files = sorted(p for p in path.glob("*.jpg") if p.is_file())
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}\0{file_sha256(p)}\n".encode())
    return h.hexdigest(), len(files)


@dataclass
class Check:
    """One line of the report: ``status`` is ok | mismatch | missing (a file) or absent (a whole dataset)."""
    dataset: str
    file: str
    status: str
    detail: str = ""


def check_dataset(name: str, root: Path) -> list[Check]:
    """Check dataset ``name``'s files under ``root`` against :data:`CHECKSUMS`."""
    folder, files = LAYOUT[name]
    if not (root / folder).is_dir():
        return [Check(name, f"{folder}/", "absent", f"not present; see {GET_DATA}")]
    out = []
    for f in files:
        path = root / folder / f
        if not path.exists():
            out.append(Check(name, f"{folder}/{f}", "missing", f"see {GET_DATA}"))
            continue
        got, count = folder_sha256(path) if f.endswith("/") else (file_sha256(path), None)
        expected = CHECKSUMS[name][f]
        what = f" ({count} posters)" if count is not None else ""
        if got == expected:
            out.append(Check(name, f"{folder}/{f}", "ok", f"sha256 {got[:16]}...{what}"))
        else:
            out.append(Check(name, f"{folder}/{f}", "mismatch", f"sha256 {got}{what}, expected {expected}: not the "
                             "reference copy, so results will differ from the committed ones"))
    return out


def check_data(data_root: str | Path | None = None, require_all: bool = False) -> tuple[list[Check], int]:
    """(every dataset's checks, exit code): 0 when every dataset present checks out; 1 when a file is
    missing from a present dataset or differs from the reference, or (``require_all``) a dataset is absent.
    No data root at all raises DataError (as loading would)."""
    root = resolve_data_root(data_root)
    checks = [c for name in LAYOUT for c in check_dataset(name, root)]
    bad = {"missing", "mismatch"} | ({"absent"} if require_all else set())
    return checks, int(any(c.status in bad for c in checks))


def report(checks: list[Check], root: Path, code: int) -> str:
    """The report check-data prints: the data root, one line per file, then a summary."""
    w = max(len(c.file) for c in checks)
    lines = [f"data root: {root}"] + [f"{c.status:8s} {c.file:{w}s}  {c.detail}" for c in checks]
    by = {s: len({c.dataset for c in checks if c.status == s}) for s in ("absent", "missing", "mismatch")}
    failed = len({c.dataset for c in checks if c.status in ("missing", "mismatch")})
    present = len(LAYOUT) - by["absent"]
    lines.append(f"{present - failed} of {len(LAYOUT)} datasets present and matching the reference copies, "
                 f"{failed} failing, {by['absent']} not present" + ("" if code == 0 else " -> exit code 1"))
    return "\n".join(lines)
