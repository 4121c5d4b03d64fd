"""Files written all or nothing: a temporary file in the same folder, fsync, then a rename.

Run files, caches, result tables, figures and bench tables all go through :func:`atomic_write_bytes`,
so a crash or a failed write (a full disk, a read-only folder) leaves the old file or the new one,
never a mix. Standard library only: the data layer and the notebook helpers use it without torch.
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

_TMP = re.compile(r"\..+\.tmp\d+")  # atomic_write_bytes' temporary names: .<name>.tmp<pid>


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash at any point leaves either the old or the new ``path``, never a mix; a killed process
    may leave its ``.<name>.tmp<pid>`` behind (:func:`remove_stale_temporaries` clears those).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):  # e.g. a read-only folder: keep the first error
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):  # disk full, read-only, ...: name the file it was writing
            raise OSError(e.errno, f"cannot write {path} ({e.strerror})") from None
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete ``.<name>.tmp<pid>`` files a killed run left in ``folder``; returns them."""
    stale = [p for p in Path(folder).iterdir() if p.is_file() and _TMP.fullmatch(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
